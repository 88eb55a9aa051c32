"""The `voicebus` command line."""
