"""The HTTP service over one store (``xpstore serve``; docs/service.md) and the operator's
pictures (``xpstore report``). FastAPI, uvicorn and matplotlib are optional extras (``serve``,
``plots``): nothing here is imported by the store itself."""
