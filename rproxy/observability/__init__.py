"""What the workers count and show: metrics, the admin listener, the status page and feed."""
