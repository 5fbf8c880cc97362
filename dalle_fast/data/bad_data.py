"""Counting bad data instead of crashing a long run."""
import collections
import warnings


class BadDataWarning(UserWarning):
    """Warned once per skipped item (unreadable image, missing caption, corrupt shard)."""


class BadDataCounter:
    """Counts skipped items by reason ('unreadable_image', 'missing_caption', 'corrupt_shard', ...)
    and warns once per item. Readers share one counter with the trainer, which reports .total.
    (Counts made inside DataLoader worker processes stay in those processes: the trainers read
    with num_workers=0 on the CPU.)

    Args:
        max_warnings: warnings shown before the rest are suppressed (still counted).
    """

    def __init__(self, max_warnings=20):
        self.counts = collections.Counter()
        self.max_warnings = max_warnings

    def add(self, reason, detail=""):
        """Counts one skipped item and warns (up to max_warnings).

        Args:
            reason: e.g. 'unreadable_image'.
            detail: what was skipped (a path, a shard), shown in the warning.
        """
        self.counts[reason] += 1
        if self.total <= self.max_warnings:
            warnings.warn(f"skipping bad data ({reason}): {detail}", BadDataWarning, stacklevel=3)
        elif self.total == self.max_warnings + 1:
            warnings.warn("more bad data: further warnings suppressed (see the counter)", BadDataWarning,
                          stacklevel=3)

    @property
    def total(self):
        return sum(self.counts.values())

    def as_dict(self):
        """Returns:
            {reason: count}.
        """
        return dict(self.counts)

    def __repr__(self):
        return f"BadDataCounter({dict(self.counts)})"
