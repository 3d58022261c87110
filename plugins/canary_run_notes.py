"""Airflow plugin: show each canary step's outcome as the DAG run's note in the Airflow UI.

Task code cannot write run notes in Airflow 3 (the execution API sets a note only on a run a
task *triggers*), so the `iot_canary` task publishes the stage as the XCom `note` and this
listener, which runs where the run's state is decided (scheduler, or `airflow dags test`) with a
database session, copies it into the run's note when the run finishes.
"""

from __future__ import annotations

import logging

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

CANARY_DAG_SUFFIX = "_canary"  # every dataset's canary DAG (dags/canary.py)
STAGE_XCOM = ("evaluate", "note")  # (task id, key): evaluate returns a dict, pushed per key
log = logging.getLogger(__name__)


def _stage(session, dag_run) -> str | None:
    from airflow.models.xcom import XComModel

    task_id, key = STAGE_XCOM
    row = session.scalars(
        XComModel.get_many(run_id=dag_run.run_id, key=key, task_ids=task_id, dag_ids=dag_run.dag_id, limit=1)
    ).first()
    return None if row is None else str(XComModel.deserialize_value(row))


def _set_note(dag_run, prefix: str) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy.orm import object_session

    session = object_session(dag_run)
    if session is not None:  # the scheduler: write through its own transaction (no second writer)
        stage = _stage(session, dag_run)
        if stage:
            dag_run.note = (prefix + stage)[:1000]
        return
    with create_session() as session:  # `airflow dags test`: the run object is detached
        stage = _stage(session, dag_run)
        run = session.get(DagRun, dag_run.id)
        if stage and run is not None:
            run.note = (prefix + stage)[:1000]


class CanaryRunNotes:
    @hookimpl
    def on_dag_run_success(self, dag_run, msg):
        self._annotate(dag_run, "")

    @hookimpl
    def on_dag_run_failed(self, dag_run, msg):
        self._annotate(dag_run, "FAILED: ")

    @staticmethod
    def _annotate(dag_run, prefix: str) -> None:
        if not dag_run.dag_id.endswith(CANARY_DAG_SUFFIX):
            return
        try:
            _set_note(dag_run, prefix)
        except Exception:  # a note is a view: never break the scheduler over it
            log.exception("could not set the canary run note")


class CanaryRunNotesPlugin(AirflowPlugin):
    name = "canary_run_notes"
    listeners = [CanaryRunNotes()]
