"""Widgets of the wallet's main screen; each renders state handed to it and posts messages, no IO."""
