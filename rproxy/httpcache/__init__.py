"""An HTTP cache for the proxy: RFC 9111 rules and the stores behind them."""
