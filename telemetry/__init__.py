"""Operations: Prometheus metrics and structured logs for every part of Remontée.

- `telemetry.logs`: JSON log lines carrying the call id or the upload id (`configure_logging`).
- `telemetry.metrics`: every metric object (`remontee_*`), counted and timed in the processes.
- `telemetry.state`: what is read at scrape time (queue depths, relay backlogs, table counts).
- `telemetry.multiprocess`: prometheus_client's multiprocess mode for gunicorn and RQ's work horses.
- `telemetry.exposition`: `/metrics` on the Flask apps, the listener of the IVR and the RQ workers.
- `telemetry.ivr`, `telemetry.worker`: what the FastAGI server and the RQ workers add.

`telemetry.logs` and `telemetry.multiprocess` import nothing of prometheus_client at import
time: entry points configure them before the metrics exist (README, "Operations").
"""
