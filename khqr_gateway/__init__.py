"""khqr-gateway: watches Bakong KHQR payments and delivers signed webhooks."""

__version__ = "0.1.0"
