"""The wallet's screens: log in, then one main screen."""
