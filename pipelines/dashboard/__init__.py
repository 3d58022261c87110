"""`platform dashboard`: a live web page of what the platform sees, per dataset and device.

Modules:
  data   what the page shows, read from the platform's own stores (the lake's bronze through silver's
         rules, scored by the champion with the live scorer's own code; the registry; the canary's
         rollout state; the monitoring job's drift reports; the stream's device state in Redis)
  app    the HTTP app (FastAPI): the page, and the JSON snapshot it polls
  page   the page itself (HTML, CSS and JS in one string: no CDN, nothing to download)
  cli    the `platform dashboard` subcommand
"""
