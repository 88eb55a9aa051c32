"""Text-to-speech backends behind one small interface (see base.py)."""
