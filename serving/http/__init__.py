"""The HTTP service: the FastAPI app and its thin routes, the work behind them, the cross-task batcher,
the model process it runs the bank in, settings, limits, schemas, Prometheus metrics, the HTTP status
of every error (errors.HTTP_STATUS), and the `increlora-serve` command. The top level of serving.
"""
from .app import create_app
from .settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
