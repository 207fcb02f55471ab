"""shrinkserve HTTP server: OpenAI schemas, routing, metrics, settings, engines."""

if __name__ != "shrinkserve.server":
    # Reached as a top-level `server` (the repository root on sys.path): that name is not
    # ours; see kernels/_toplevel.py.
    import runpy

    runpy.run_path(__file__.removesuffix("__init__.py") + "../kernels/_toplevel.py")["hand_over"](__name__)
