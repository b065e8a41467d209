"""The app's screens: one module per screen (app modes and dialogs)."""
