"""Model-card templates; installed as the data package ``kvemb_st.model_cards`` (see pyproject.toml)."""
