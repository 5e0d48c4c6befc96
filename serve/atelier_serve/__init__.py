"""The Stable Diffusion serving application on Ray Serve: a FastAPI ingress in front of an
autoscaled, multiplexed, batching model deployment. Serve imports `atelier_serve.app:build`."""

__all__ = ["build"]


def __getattr__(name: str):
    # Lazy, so that importing a light module of the package (auth, pipelines) does not import
    # Ray Serve.
    if name == "build":
        from atelier_serve.app import build

        return build
    raise AttributeError(f"module 'atelier_serve' has no attribute {name!r}")
