"""Reports: the accuracy-efficiency trade-off of a study as figures, tables and a self-contained HTML page.

* :mod:`~rankwise.reports.document` - the ``rankwise.study/1`` results document: loading, checks, accessors;
* :mod:`~rankwise.reports.plots` - study figures (accuracy and efficiency vs size, Pareto fronts,
  sensitivity heatmap, rank maps), pure functions from the document to a matplotlib Figure;
* :mod:`~rankwise.reports.spectra` - singular-value spectra of a model and their figures (``inspect --plot``);
* :mod:`~rankwise.reports.pareto` - objectives and Pareto fronts;
* :mod:`~rankwise.reports.tables` - the trial table and best points under parameter budgets;
* :mod:`~rankwise.reports.figures` - which figures a report holds; :mod:`~rankwise.reports.html` - the page;
* :mod:`~rankwise.reports.build` - writing the report folder atomically (``rankwise report``).
"""

from rankwise.reports.build import build_report
from rankwise.reports.document import check_document, load_document
from rankwise.reports.source import load_source

__all__ = ["build_report", "check_document", "load_document", "load_source"]
