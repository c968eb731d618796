"""Who may call and spend: API keys, budgets, rate limits, and the accounting that wires them to the store."""
