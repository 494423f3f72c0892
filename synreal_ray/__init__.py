"""synreal-ray: synthetic-to-real translation of driving datasets on Ray."""

__version__ = "0.1.0"
