"""The Streamlit app's UI: the shell (page config, navigation, sidebar), shared widgets and the four pages."""
