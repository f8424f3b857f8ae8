"""`layout.scale: proportional`: the configured role counts read as proportions and re-planned for the ranks a job
actually got (a job submitted with `--nodes=2-6`, or requeued on another allocation). Pure arithmetic, used by the
layout plan at every start (`hpc_rlhf.distributed.layout`) and by the config checks before submitting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class ScaleError(ValueError):
    """The job has too few ranks (or ranks that no role can take) for a proportional layout; one line."""


def configured_world_size(sizes: Mapping[str, tuple[int, int]], shares: Mapping[str, str], colocate: bool) -> int:
    """The ranks the configured counts give out: one role's count when colocated, else the owners' sum."""
    present = [gpus for name, (gpus, _) in sizes.items() if gpus > 0 and (colocate or name not in shares)]
    return max(present, default=0) if colocate else sum(present)


def scale_role_sizes(sizes: Mapping[str, tuple[int, int]], shares: Mapping[str, str], colocate: bool,
                     world_size: int, role_order: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(gpus, tp) per role re-planned for a `world_size`-rank job, the configured counts read as proportions.

    Colocated: every present role spans the job. Disaggregated: each role that owns its ranks gets
    floor(its share of the job) in units of one rank (one `tp`-rank engine for the generator), at least one unit,
    and the ranks left go one unit at a time to the largest remainder (ties: earlier in `role_order`); a
    `share_with` role takes its target's count. Raises `ScaleError` when the job cannot give every present role its
    one unit.
    """
    if colocate:
        return {name: (world_size if gpus > 0 else 0, tp) for name, (gpus, tp) in sizes.items()}
    base = configured_world_size(sizes, shares, colocate)
    owners = [name for name, (gpus, _) in sizes.items() if gpus > 0 and name not in shares]
    if base < 1 or not owners:
        return dict(sizes)
    unit = {name: sizes[name][1] if name == "generator" else 1 for name in owners}
    exact = {name: sizes[name][0] / unit[name] * world_size / base for name in owners}
    units = {name: max(1, int(exact[name])) for name in owners}
    left = world_size - sum(units[name] * unit[name] for name in owners)
    if left < 0:
        need = " + ".join(f"{name} {units[name] * unit[name]}" for name in owners)
        raise ScaleError(f"layout.scale: proportional: the job has {world_size} ranks, fewer than one rank (one "
                          f"engine of generator.tp={sizes['generator'][1]} for the generator) per role: {need} = "
                          f"{world_size - left}")
    while left > 0:
        fits = [name for name in owners if unit[name] <= left]
        if not fits:
            raise ScaleError(f"layout.scale: proportional: {left} rank(s) of the {world_size} are left over and no "
                              f"role takes them (generator engines have generator.tp={sizes['generator'][1]} ranks)")
        best = max(fits, key=lambda name: (exact[name] - units[name], -list(role_order).index(name)))
        units[best] += 1
        left -= unit[best]
    scaled = {name: (units[name] * unit[name], sizes[name][1]) if name in units else (0, sizes[name][1])
              for name in sizes}
    for name, target in shares.items():
        if sizes[name][0] > 0:
            scaled[name] = (scaled[target][0], sizes[name][1])
    return scaled
