"""Walking a jaxpr in tests: structural checks (what a gradient recomputes, which kernels it calls)."""


def iter_eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in its equations' params (remat, scan,
    custom_vjp, pjit), depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for j in p if isinstance(p, (list, tuple)) else [p]:
                if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                    yield from iter_eqns(j.jaxpr)
                elif hasattr(j, "eqns"):
                    yield from iter_eqns(j)
