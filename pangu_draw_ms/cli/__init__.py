"""Command-line entry points, each a module with ``main(argv=None)``: installed as console scripts
(``pangu-draw-infer``, ``pangu-draw-train``, ...; see setup.py) and wrapped by ``tools/*.py`` so that the
documented ``python tools/<name>.py`` commands work from a checkout."""
