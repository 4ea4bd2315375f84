"""Operation handlers, one module per domain. Each is ``async def <op>(s: Services, h:
RequestHandle)``, named after its operation: it returns the result of a one-shot operation, or
drives a stream through ``h``. A plain function ``<op>_now`` beside it is an inline path tried
first (:mod:`lorad.daemon.operations` finds both by name; other functions here start with ``_``).
"""
