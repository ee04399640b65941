"""Continue-as-new chains seen from a client: which run of a chain a call naming one acts on.

A run that calls ``ctx.continue_as_new`` ends ``done`` and points at its successor
(``continued_to``; migration 0011). Callers keep the id they started with, as Temporal users
keep a workflow id: ``result()`` waits for the chain's final run (``handle.py``), and
``cancel``/``signal`` go to the chain's live run (``engine.py``) through :func:`last_run`.
"""

from __future__ import annotations

from .cores.base import Core


async def last_run(core: Core, run_id: str) -> str | None:
    """The id of the last run of the chain that ``run_id`` belongs to (``run_id`` itself when
    it never continued), or None when there is no such run. One statement (``chain_last``)."""
    rows = await core.admin_query("chain_last", run_id)
    return str(rows[0]["id"]) if rows else None
