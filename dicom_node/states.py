"""The states of a case and of a delivery, in one place (the database stores these strings).

Kept apart from :mod:`dicom_node.db` so that code that only names a state (the demo, the status view) does not
import SQLAlchemy. Docs: README "Queue".
"""

from __future__ import annotations

__all__ = ["CASE_STATES", "DELIVERY_STATES", "DONE", "FAILED", "FINAL_STATES", "PENDING", "PROCESSED_STATES",
           "QUEUED", "RUNNING", "SENDING", "SENT", "SKIPPED"]

# done = results written, deliveries pending; sent = every destination has them; skipped = nothing to process
# (the reason says why) or superseded by a newer version of the study.
QUEUED, RUNNING, DONE, FAILED, SENT, SKIPPED = "queued", "running", "done", "failed", "sent", "skipped"
CASE_STATES = (QUEUED, RUNNING, DONE, FAILED, SENT, SKIPPED)
FINAL_STATES = (DONE, SENT, SKIPPED, FAILED)  # a case in one of these is not processed again by itself
PROCESSED_STATES = (DONE, SENT)  # results were written
PENDING, SENDING = "pending", "sending"
DELIVERY_STATES = (PENDING, SENDING, SENT, FAILED)
