// twostep: the little JavaScript the pages need (kept in a file so the CSP can forbid inline scripts).
