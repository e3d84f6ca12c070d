"""Cox proportional-hazards loss for torch heads.

With risk scores ``r`` and event times ``t``, the Breslow log partial likelihood is

    log L = sum over events i of [ r_i - log sum_{j : t_j >= t_i} exp(r_j) ]

(tied times share one risk set that holds every tied volume). The loss is ``-log L / n_events``.
"""

import torch


def cox_partial_likelihood_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Breslow log partial likelihood per event: scalar tensor, differentiable in ``risk``.

    ``risk`` ``[V]`` float (log hazard ratio, higher = earlier event), ``time`` ``[V]`` float, ``event`` ``[V]`` bool
    (False = censored at ``time``). Returns 0 (still attached to ``risk``) when there is no event.
    """
    if not (risk.ndim == time.ndim == event.ndim == 1 and risk.shape == time.shape == event.shape):
        raise ValueError(f"risk, time and event must be [V] of one length, got {tuple(risk.shape)}, "
                         f"{tuple(time.shape)}, {tuple(event.shape)}")
    event = event.to(torch.bool)
    order = torch.argsort(time)
    sorted_time, sorted_risk = time[order], risk[order]
    # log sum of exp(risk) over positions k.. of the ascending order: the risk set of everything at or after k
    log_tail_sums = torch.flip(torch.logcumsumexp(torch.flip(sorted_risk, [0]), 0), [0])     # [V]
    first_at_or_after = torch.searchsorted(sorted_time, time, side="left")                   # [V]
    log_risk_set = log_tail_sums[first_at_or_after]                                           # [V]
    n_events = event.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -(risk - log_risk_set)[event].sum() / n_events
