"""The interactive circuit explorer: one self-contained HTML page per study.

:mod:`.study_data` gathers what the page shows with the existing scoring and characterisation
functions, :mod:`.layout` places the nodes (layers as ranks, no graphviz), :mod:`.page` inlines
the template, style, vendored D3 and data into one file, and :class:`Study` ties them together.
"""

from circuitgraph.explore.study_data import Limits, collect
from circuitgraph.explore.study import Study

__all__ = ["Limits", "Study", "collect"]
