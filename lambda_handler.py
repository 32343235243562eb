"""AWS Lambda entry point: the FastAPI app behind an API Gateway HTTP API.

Importing this module builds the app and connects to nothing: engines, tables
and token signing keys are made on first use and then reused for the life of
the execution environment. Mangum would run lifespan events on every
invocation, so they are off and nothing depends on them.

`API_GATEWAY_BASE_PATH` names the stage (e.g. `prod`) when the API is deployed
on a named stage rather than `$default`; it becomes the ASGI `root_path`.

Besides API Gateway events, `handler` takes scheduled tasks: an event
`{"task": "<name>"}` (sent by EventBridge Scheduler) runs `SCHEDULED_TASKS[name]`:
today only the sweep, which also publishes the queue gauges (main.run_sweep).
"""

import json

from mangum import Mangum

from main import app, log_unhandled, run_sweep
from settings import settings_from_env

_JSON_500 = json.dumps({"detail": "Internal Server Error"}).encode()


def answer_unhandled_errors(asgi_app):
    """Keep an unhandled exception to one JSON log line and a JSON 500.

    main.py's catch-all handler answers and logs such an exception, after which
    Starlette re-raises it for the server; Mangum would then log it again as a
    multi-line traceback. So an exception after a complete response is dropped
    here, and one raised before any response is logged and answered here.
    """

    async def app_answering_errors(scope, receive, send):
        started = complete = False

        async def tracking_send(message):
            nonlocal started, complete
            started = True
            if message["type"] == "http.response.body":
                complete = not message.get("more_body", False)
            await send(message)

        try:
            await asgi_app(scope, receive, tracking_send)
        except Exception as error:
            if complete:
                return
            log_unhandled(scope, error)
            if started:
                raise  # the status is already sent; Mangum answers a plain 500
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": _JSON_500})

    return app_answering_errors


def on_stage(asgi_app, base_path: str):
    """The stage the API is deployed on (API_GATEWAY_BASE_PATH) as the ASGI
    `root_path`, the idiom for an app mounted below a prefix: routes match
    without it, and every URL the app writes (a Link's next page, the docs'
    openapi.json) keeps it. Mangum's own base-path option strips the stage
    from the path and leaves root_path empty, so those URLs would lose it."""
    prefix = "/" + base_path.strip("/")
    if prefix == "/":
        return asgi_app

    async def app_on_stage(scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (
            path == prefix or path.startswith(prefix + "/")
        ):
            scope = {**scope, "root_path": prefix}
        await asgi_app(scope, receive, send)

    return app_on_stage


def build_handler(asgi_app) -> Mangum:
    """The Lambda handler for `asgi_app`, configured from the environment."""
    base_path = settings_from_env().api_gateway_base_path
    return Mangum(
        answer_unhandled_errors(on_stage(asgi_app, base_path)), lifespan="off"
    )


http_handler = build_handler(app)


# Scheduled tasks by the event's "task" value: one line per task.
SCHEDULED_TASKS = {
    "sweep": lambda _event: run_sweep(app),
}
# The input of the sweep schedule (terraform/schedule.tf).
SWEEP_EVENT = {"task": "sweep"}


def handler(event, context):
    """API Gateway events go to the app; `{"task": ...}` events to their task."""
    task = event.get("task") if isinstance(event, dict) else None
    if task is None:
        return http_handler(event, context)
    if task not in SCHEDULED_TASKS:
        raise ValueError(f"unknown scheduled task {task!r}")
    return SCHEDULED_TASKS[task](event)


def migrate(event, context):
    """The migration function's entry point (terraform/migrations.tf): runs
    `alembic upgrade head` and grants the application role (migration.py).
    An error is raised, so the invocation, and `terraform apply`, fail with it."""
    import migration

    return migration.run()
