"""How every report writes a number, an interval, a p-value and a verdict (probe, demo, robustness, console).

One place, so that a p below 0.001 reads "<0.001" in every table and sentence, an undefined value reads "n/a",
and a verdict sentence always carries the p-value it was judged on.
"""

import math

from braindino.probe.compare import judged_p, verdict
from braindino.probe.results import Comparison


def number(value, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; None, NaN or ±inf → "n/a"."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def signed(value) -> str:
    """``value`` with an explicit sign and three decimals ("+0.120", "-0.050"); undefined → "n/a"."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.3f}"


def interval(low, high, with_sign: bool = False) -> str:
    """"[low, high]" (each :func:`signed` when ``with_sign``, else :func:`number`)."""
    shown = signed if with_sign else number
    return f"[{shown(low)}, {shown(high)}]"


def format_p(value) -> str:
    """A p-value: three decimals, "<0.001" below that, "n/a" when undefined."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def p_text(comparison: Comparison, over_run: bool = False) -> str:
    """"p=0.004, Holm 0.012" (or "p<0.001"): the raw p, then the adjusted p the verdict is judged on when it
    differs (:func:`~braindino.probe.compare.judged_p`)."""
    raw, judged = comparison.p_value, judged_p(comparison, over_run)
    shown = "p" + ("" if raw is not None and math.isfinite(raw) and raw < 0.001 else "=") + format_p(raw)
    return shown + ("" if judged is None or judged == raw else f", Holm {format_p(judged)}")


def verdict_text(comparison: Comparison | None, higher_is_better: bool, alpha: float, over_run: bool = False) -> str:
    """"better (p=…, Holm …)", "worse (…)", "no significant difference (…)", or why there is no verdict."""
    if comparison is None:
        return "not compared (setting not run)"
    judged = verdict(comparison, higher_is_better, alpha, over_run)
    if judged == "not testable":
        return "not testable (p undefined)"
    return f"{judged} ({p_text(comparison, over_run)})"
