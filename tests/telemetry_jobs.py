"""Stand-ins for the `ocr` job's function in the worker's telemetry test, until the OCR pipeline is on main:
the worker, RQ, Redis and the metrics are real; only what the job computes is not."""

from __future__ import annotations

import logging

log = logging.getLogger("pen_gateway.recognition.job")


def recognized_for_review(upload_id: str) -> dict[str, str]:
    log.info("upload %s: read, one field unsure", upload_id)
    return {"upload_id": upload_id, "status": "review"}


def broken(upload_id: str) -> dict[str, str]:
    log.info("upload %s: cannot be read", upload_id)
    raise ValueError(f"no form on upload {upload_id}")


def already_accepted(upload_id: str) -> dict[str, object]:
    """What the real job answers for an upload an earlier job already recognized (a job run twice)."""
    from pathlib import Path

    from pen_gateway.recognition.job import _outcome
    from pen_gateway.uploads import Upload

    return _outcome(Upload(upload_id, "0" * 64, Path("/nonexistent"), "image/png", 1, "station-7", None, "750120",
                           None, "accepted", "R1", "RC1", None, 0.0))
