"""htmx glue: one predicate for "is this an htmx request" and one renderer for page-or-fragment."""
from urllib.parse import parse_qs, urlsplit

from flask import make_response, render_template, request
from werkzeug.urls import iri_to_uri


def is_htmx(current=None):
    """True when htmx made this request, or the request `current` (a caller that holds the request object
    saves a read through Flask's proxy), and it is not a history restore, which wants the full page."""
    headers = (request if current is None else current).headers
    return headers.get("HX-Request") == "true" and headers.get("HX-History-Restore-Request") != "true"


def page_query():
    """The query of the page an htmx request came from (HX-Current-URL), first value of each name; {} when it
    has none, or the header is not an address ("http://[x"). The browser's to set, as the query itself is:
    a section an action sends back is shown as on the page it replaces (which list, which page of it)."""
    shown = request.headers.get("HX-Current-URL", "")
    try:
        return {k: v[0] for k, v in parse_qs(urlsplit(shown).query).items()} if "?" in shown else {}
    except ValueError:
        return {}


def render(page, fragment, status=200, **context):
    """Render the whole page, or only its fragment for htmx (the templates see which as `fragment_only`);
    either way the answer varies on HX-Request."""
    fragment_only = is_htmx()
    template = fragment if fragment_only else page
    response = make_response(render_template(template, fragment_only=fragment_only, **context), status)
    response.vary.add("HX-Request")
    return response


def hx_redirect(location, status=401):
    """Tell htmx to load `location` as a full page (a 302 would be swapped into the fragment).

    Written as a URI, as werkzeug writes a Location header: a same-site `next` a visitor chose may hold "€"
    or DEL, which a header cannot carry (gunicorn answers 500 for the whole response)."""
    response = make_response("", status)
    response.headers["HX-Redirect"] = iri_to_uri(location)
    return response
