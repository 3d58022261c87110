"""Flask-AppBuilder settings of Airflow's FAB auth manager (docker-compose mounts this file as
$AIRFLOW_HOME/webserver_config.py): database users, and a login rate limit so guessing passwords
is slowed down (the simple auth manager had none: 40 wrong logins in a row met no lockout)."""

from flask_appbuilder.const import AUTH_DB

AUTH_TYPE = AUTH_DB
# flask-limiter on the login view: at most 5 attempts per 40 s per client address, then HTTP 429.
AUTH_RATE_LIMITED = True
AUTH_RATE_LIMIT = "5 per 40 second"
# No self-registration: the admin creates users (airflow-init creates the admin from .env).
AUTH_USER_REGISTRATION = False
