"""Strife wallet: a Textual terminal wallet with an offline outbox (CONTRACT §8).

The headless core (`settings`, `money`, `gateway`, `storage`, `outbox`, `sync`, `core`) never imports Textual;
the UI (`app`, `screens/`, `widgets/`, `commands`, `messages`) only renders its state and runs its IO in workers.
"""
