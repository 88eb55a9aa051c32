"""The voicebus actor runtime: messages, bus, actors, supervisor, settings.

Nothing in here knows about voice; workers build on it.
"""

__version__ = "0.1.0"
