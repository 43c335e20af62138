"""`layerskip serve`: an OpenAI-compatible HTTP server on continuously batched self-speculative decoding.

protocol.py is the wire format, scheduler.py the decoding loop (one thread owning the model and the batch),
metrics.py the Prometheus metrics, app.py the FastAPI routes and `serve`, replicas.py the other ranks' side
under tensor parallelism.
"""

from layerskip.serve.app import Server, ServerSettings, create_app, serve

__all__ = ["Server", "ServerSettings", "create_app", "serve"]
