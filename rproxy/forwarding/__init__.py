"""The last handler: one exchange with an upstream, or a tunnel after an Upgrade."""
