"""Post-processing per side, as sentence-transformers' own :class:`~sentence_transformers.base.modules.Router`.

When the sides of a model read out so differently that one set of calibration statistics serves neither, each
side gets a set of its own: a ``Router`` after the embedding module, one route per statistics set, picked by the
call's ``task`` (``encode_query`` / ``encode_document``; ``encode(prompt_name=...)`` gets it from
:class:`~kvemb_st.module.KVEmbedding`, which puts the side into ``features["task"]``). Plain ``encode`` takes the
``default`` route. The backbone stays one module, loaded once; the routes hold only the small statistics modules.
"""

from __future__ import annotations

from collections.abc import Mapping

from sentence_transformers.base.modules import Router
from torch import nn

from kvemb_st.side import SIDE_NAMES

DEFAULT_ROUTE = "default"
ROUTER_TYPE = f"{Router.__module__}.{Router.__name__}"


def side_router(default: nn.Module, sets: Mapping[str, nn.Module], sides: Mapping[str, str]) -> Router:
    """A Router whose route ``name`` runs ``sets[name]``; side ``s`` takes route ``sides[s]``, plain ``encode`` and
    every side not in ``sides`` the ``default`` module (each side gets a route: ST sends its task whatever the
    model's sides are)."""
    if DEFAULT_ROUTE in sets or not sets:
        raise ValueError(f"side statistics need at least one named set, none named {DEFAULT_ROUTE!r}; got {list(sets)}")
    for side, name in sides.items():
        if side not in SIDE_NAMES:
            raise ValueError(f"unknown side {side!r} for side statistics; expected one of {SIDE_NAMES}")
        if name not in sets:
            raise ValueError(f"side {side!r} uses statistics {name!r}, which are not among {sorted(sets)}")
    return Router(
        {DEFAULT_ROUTE: [default], **{name: [module] for name, module in sets.items()}},
        default_route=DEFAULT_ROUTE,
        allow_empty_key=False,
        route_mappings={(side, None): sides.get(side, DEFAULT_ROUTE) for side in SIDE_NAMES},
    )


def route_of(router: Router, side: str | None) -> nn.Module:
    """The module side ``side`` (``None``: plain ``encode``) runs through, as the Router resolves it."""
    route = router.sub_modules[router._resolve_route(task=side)]
    return route[0]
