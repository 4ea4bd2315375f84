"""Operation handlers, one module per domain. Each is ``async def op(s: Services, h:
RequestHandle)``: it returns the result of a one-shot operation, or drives a stream through
``h``. The table that names them is :mod:`lorad.daemon.operations`."""
