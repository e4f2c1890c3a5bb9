"""Privacy math (pure functions) and the privacy ledger format."""
