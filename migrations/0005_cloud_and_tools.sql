-- Ollama's cloud features spend the server owner's ollama.com account: cloud models
-- (`…:cloud` / `…-cloud`) forward the prompt to ollama.com, and server-side tools (the
-- Responses API's `web_search`) make the backend reach the internet. Both are off unless
-- the tenant or the key allows them. Numbered 0005: 0004 is taken by key rotation.

-- false: no cloud models or server-side tools for the tenant's keys (unless a key allows them).
ALTER TABLE tenants ADD COLUMN allow_cloud boolean NOT NULL DEFAULT false;
-- NULL: inherit the tenant's allow_cloud; true/false: this key's own setting.
ALTER TABLE api_keys ADD COLUMN allow_cloud boolean;
-- The server-side tools the gateway removed from the request, comma-separated (NULL: none).
ALTER TABLE request_log ADD COLUMN removed_tools text;
