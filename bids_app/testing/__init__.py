"""bids_app.testing."""
