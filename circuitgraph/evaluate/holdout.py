"""A circuit on rows it was not found on: its faithfulness there beside its faithfulness on the rows it was
found on, and whether the drop is beyond noise.

A circuit chosen because it scores well on some rows is partly fitted to them; on other rows of the same
task its faithfulness is the honest figure.  The two samples are independent, so the drop's standard error
is ``sqrt(se_found**2 + se_held**2)``, and a drop of more than :data:`FLAG_SE` of them is flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from circuitgraph.data.dataset import DataError, TaskData
from circuitgraph.evaluate.evaluator import CircuitScore

FLAG_SE = 2.0


@dataclass
class Holdout:
    """A circuit's faithfulness on held-out rows beside the rows
    it was found on, and whether the drop is beyond noise."""

    found: CircuitScore  # on the rows the circuit was found on
    held: CircuitScore  # on the held-out rows
    source: str  # where the held-out rows came from, for messages
    drop: float | None  # faithfulness found - held; None where either is undefined
    drop_se: float | None
    flagged: bool | None  # drop > FLAG_SE * drop_se; None where that cannot be told
    reason: str | None = None  # why drop or flagged is None

    def line(self) -> str | None:
        """One line when the drop is flagged."""
        if not self.flagged:
            return None
        f, h = self.found, self.held
        return (f"faithfulness drops from {f.faithfulness:.3f} ± {f.faithfulness_se:.3f} on the {f.n_examples} rows the circuit "
                f"was found on to {h.faithfulness:.3f} ± {h.faithfulness_se:.3f} on {h.n_examples} held-out rows ({self.source}): "
                f"{self.drop:.3f}, more than {FLAG_SE:g} combined standard errors ({FLAG_SE * self.drop_se:.3f})")

    def to_dict(self) -> dict:
        """The comparison as plain JSON types."""
        return {"source": self.source, "held_out": self.held.to_dict(), "drop": self.drop, "drop_se": self.drop_se,
                "flag_se": FLAG_SE, "flagged": self.flagged, "undefined_reason": self.reason}


def compare(found: CircuitScore, held: CircuitScore, source: str = "held-out rows") -> Holdout:
    """The drop of faithfulness from ``found`` to ``held`` and whether it exceeds :data:`FLAG_SE` combined s.e."""
    for where, s in (("the rows it was found on", found), ("the held-out rows", held)):
        if s.faithfulness is None:
            return Holdout(found, held, source, None, None, None, f"faithfulness is undefined on {where}: {s.undefined_reason}")
    drop = found.faithfulness - held.faithfulness
    if found.faithfulness_se is None or held.faithfulness_se is None:
        return Holdout(found, held, source, drop, None, None, "one example on a side: no standard error, so no flag")
    se = math.hypot(found.faithfulness_se, held.faithfulness_se)
    return Holdout(found, held, source, drop, se, bool(drop > FLAG_SE * se))


def split_rows(data: TaskData, fraction: float) -> tuple[TaskData, TaskData]:
    """``(found, held)``: the last ``ceil(fraction * N)`` rows held out, the others kept; each side needs a row."""
    if not 0 < fraction < 1:
        raise DataError(f"a held-out fraction must be in (0, 1), got {fraction:g}")
    n = len(data)
    k = math.ceil(fraction * n)
    if k >= n:
        raise DataError(f"holding out {fraction:g} of {n} rows leaves none to have found the circuit on")
    return data.slice(0, n - k), data.slice(n - k, n)


__all__ = ["FLAG_SE", "Holdout", "compare", "split_rows"]
