"""What several test modules share: builders of models and studies (harnesses stay beside the tests)."""
