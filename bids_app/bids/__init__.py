"""bids_app.bids."""
