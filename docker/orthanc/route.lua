-- Route every stable series Orthanc receives to the ainode service (docker/compose.yaml).
--
-- Loaded by docker/orthanc/orthanc.json ("LuaScripts"). When a series has had no new instance for
-- "StableAge" seconds, Orthanc calls OnStableSeries; this script then queues a C-STORE job to the
-- modality "AINODE" (orthanc.json "DicomModalities"). The node stores the series and, once a user
-- segments it, stores the SEG back in Orthanc through its outbox.
--
-- Not routed: the node's own results (SEG and the other non-image modalities below) and anything the
-- node itself sent, so that a SEG stored here never loops back to the node.

local NODE_MODALITY = 'AINODE'   -- key in orthanc.json "DicomModalities"
local NODE_AET = 'AINODE'        -- the node's AE title (docker/ainode.toml [dimse] ae_title)
local NOT_ROUTED = { SEG = true, SR = true, RTSTRUCT = true, PR = true, KO = true, RTPLAN = true, DOC = true }

local function SenderAet(seriesId)
   -- The calling AE title of the series' first instance (metadata "RemoteAET"; absent for REST uploads).
   local ok, aet = pcall(function()
      local series = ParseJson(RestApiGet('/series/' .. seriesId))
      local instance = series['Instances'][1]
      local metadata = ParseJson(RestApiGet('/instances/' .. instance .. '/metadata?expand'))
      return metadata['RemoteAET']
   end)
   if ok then return aet end
   return nil
end

function OnStableSeries(seriesId, tags, metadata)
   local modality = tags['Modality'] or ''
   if NOT_ROUTED[modality] then
      print('ainode-route: series ' .. seriesId .. ' (' .. modality .. ') is a result, not routed')
      return
   end
   if SenderAet(seriesId) == NODE_AET then
      print('ainode-route: series ' .. seriesId .. ' came from the node, not routed')
      return
   end
   -- Asynchronous job: Orthanc's Lua callbacks must not block on the network.
   local body = DumpJson({ Resources = { seriesId }, Synchronous = false, Priority = 0 })
   local job = ParseJson(RestApiPost('/modalities/' .. NODE_MODALITY .. '/store', body))
   print('ainode-route: series ' .. seriesId .. ' -> ' .. NODE_MODALITY .. ', job ' .. job['ID'])
end

function OnJobFailure(jobId)
   -- Orthanc does not retry a failed job. Say which series did not reach the node and how to re-send it
   -- (the job is kept: "SaveJobs" and "JobsHistorySize" in orthanc.json).
   local ok, job = pcall(function() return ParseJson(RestApiGet('/jobs/' .. jobId)) end)
   if ok and job['Type'] == 'DicomModalityStore' and job['Content']['RemoteAet'] == NODE_AET then
      print('ainode-route: job ' .. jobId .. ' failed (' .. (job['ErrorDescription'] or '?') ..
            '); re-send with: curl -X POST http://localhost:8042/jobs/' .. jobId .. '/resubmit')
   end
end
