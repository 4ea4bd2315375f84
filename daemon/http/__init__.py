"""The OpenAI-compatible HTTP door (``lorad serve --http HOST:PORT``; the ``http`` extra).

:mod:`.openai` translates OpenAI's API (sans-IO), :mod:`.door` runs calls on the engine,
:mod:`.pool` keeps the contexts of stateless requests, :mod:`.catalog` resolves ``model``
fields to models and adapters, ``response_format`` becomes a grammar in :mod:`lorad.daemon.schemas`,
:mod:`.app` is the Starlette application and :mod:`.serve` runs it with Hypercorn's trio
worker inside the daemon's nursery.
"""
