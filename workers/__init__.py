"""The three voice actors (listener, thinker, speaker) and their backends."""
