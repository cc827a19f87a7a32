"""A bank: its ledger (balances, holds, 2PC state per transaction) and the server in front of it."""
