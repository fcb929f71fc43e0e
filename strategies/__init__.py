"""The methods: one module per federated method (both halves), plus add-ons beside any method."""
