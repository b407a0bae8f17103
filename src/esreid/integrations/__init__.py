"""esreid models inside other libraries' pipelines.

Each integration lives in its own module and imports its library lazily, so that
``import esreid.integrations.<name>`` works without it and the first use that needs it
says which extra to install:

- :mod:`esreid.integrations.boxmot`: :class:`~esreid.integrations.boxmot.BoxMOTEncoder`, the
  appearance encoder of BoxMOT's multi-object trackers (``pip install 'esreid[track]'``).
"""
