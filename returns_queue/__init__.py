"""The journal (outbox), the relay to RQ, the job contracts and the reference consolidation worker."""

from returns_queue.journal import Journal, JournalEntry, Submission

__all__ = ["Journal", "JournalEntry", "Submission"]
