"""The paper's case studies (Moar et al., IISWC 2024) on the bundled models: ``rankwise paper``.

* :mod:`.plan` - the sweeps and subsets of each mode (quick, standard, full) as study specs;
* :mod:`.run` - running them in one storage and writing the report, the results JSON and the headlines;
* :mod:`.headlines` - the three lines measured from the results (9%-size point, rank 1 vs removal, latency).
"""

from rankwise.paper.headlines import headlines
from rankwise.paper.plan import MODES, PaperPlan, build_plan, plan_lines
from rankwise.paper.run import run_plan

__all__ = ["MODES", "PaperPlan", "build_plan", "headlines", "plan_lines", "run_plan"]
