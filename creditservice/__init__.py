"""creditservice: the authority that owns wallets, quotas, reservations and the ledger."""
